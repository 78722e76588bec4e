"""The library's methods on vectors and weights: extraction (judged contrastive pairs to per-layer vectors, with their
aggregation), distillation (a steering vector into weights, by KL) and exact baking (a steering vector into biases).
The studies (``personalab.studies``) are built on them."""
