"""visionsae: sparse autoencoders on vision-model activations.

Three stages connected only by files: ``sae-extract`` writes an activation store
(``visionsae.store``, specified in cache_layout.md), ``sae-train`` trains SAEs on it
(``visionsae.sae`` holds the models and their checkpoint), ``sae-eval`` scores checkpoints.
"""

__version__ = "0.1.0"
