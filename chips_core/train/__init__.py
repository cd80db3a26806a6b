"""Training and evaluation: continual pre-training on a selected subset (``cpt``), the metrics and
suites that judge the result (``evaluate``), and the synthetic pairs and tiny CLIP of the demo and
tests (``synthetic``). Imports the scoring layer (model loading) only."""
