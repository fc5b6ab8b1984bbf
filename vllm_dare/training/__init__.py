"""Training of the project's small LLaDA- and Dream-architecture models on the
tasks it generates (``tasks.py``), with the masked-diffusion objective."""
