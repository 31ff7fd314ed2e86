"""The eval stage: FID, sFID, IS, KID and precision/recall of a samples artifact against a reference.

inception.py  finds the TF FID Inception weights and wraps them as a torch-fidelity feature extractor
              (pool, ADM spatial and logits features from one forward)
metrics.py    the metric math, delegated to torch-fidelity's functions on features; ADM's evaluator where it differs
registry.py   every metric by name (fid, sfid, is, kid, prc, and `paper`: the papers' row)
reference.py  reference artifacts (features + mu/sigma of real images) and ADM reference .npz files
stage.py      `evaluate_stage`: samples + reference -> metrics artifact + a row in results.jsonl
results.py    the results table (JSONL) and its rich rendering
sweep.py      sample-and-score over the SDE diffusion coefficient w or the guidance scale
progress.py   the rank-0 progress bar (rate and ETA)
"""
