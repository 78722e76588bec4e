"""The studies: one module (or folder) per study, each a function over the engine and the methods
(``personalab.methods``): steering sweeps, monitoring and projection, fine-tuning with its monitored shifts,
comparisons, correlation, SAE features, and the papers' tracing, localization and composition. Studies never
import each other's private helpers; what two studies need lives in a module they share or a wing below them."""
