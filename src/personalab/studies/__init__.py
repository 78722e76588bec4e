"""One module per study, each a thin layer over the engine: extraction, sweeps, monitoring,
distillation and exact baking. Studies never import each other's private helpers; what two
studies need lives in a wing below them."""
