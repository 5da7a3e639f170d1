"""The demonstration executors: code that runs a sealed model in place, on its device memory.

* ``encoder``: a numpy (or CuPy) BERT encoder for all-MiniLM-L6-v2-shaped models;
* ``decoder``: the byte-level decoder LM behind the generated example model (seeded sampling);
* ``example_model``: writes that example model (random weights from a fixed seed);
* ``safetensors_view``: the in-place views of a sealed safetensors file, shared by both.

They are demonstrations of the executor interface (``vram_residency.service.executor``), not a
production inference engine.
"""
