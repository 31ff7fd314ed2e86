"""Pure torch math of SiT: network, interpolants, objectives and samplers.

Time convention, used everywhere in this package and the toolkit:

    x_t = alpha(t) * x1 + sigma(t) * x0,    x0 ~ N(0, I) noise at t = 0,  x1 data at t = 1.

Samplers integrate forward in t, from noise (t = 0) to data (t = 1), as the paper's code does.
No file I/O, no CLI, no distributed code lives here.
"""
