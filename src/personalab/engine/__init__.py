"""The engine: everything that touches a model's forward pass.

The model handle (``handle``), loading (``loading``), LoRA adapters (``lora``), what differs per
architecture (``architectures``: block paths, exact-bake weight plans), the layer convention (``layers``), chat
formatting (``chat``), token positions (``positions``), padding and length-sorted batches
(``batching``), the one module that registers PyTorch hooks (``hooks``), all-layer capture
(``capture``), interventions (``interventions``), cached reproducible generation
(``generation``), forward passes for training and scoring (``forward``) and steering scales
(``scale``). The engine imports nothing from ``traits``, ``judging``, ``studies`` or ``cli``.
"""
