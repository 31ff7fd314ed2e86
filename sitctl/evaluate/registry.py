"""The metrics sitctl can compute, by name: what each needs and which value a sweep plots."""

METRICS = ("fid", "is", "kid", "prc")
NEEDS_REFERENCE = ("fid", "kid", "prc")
PLOTTED_VALUE = {"fid": "fid", "kid": "kid_mean", "is": "is_mean"}
