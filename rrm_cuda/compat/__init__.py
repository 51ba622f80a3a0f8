"""Drop-in shims for code written against other tools (pydensecrf, RRM/rloss's DenseEnergyLoss)."""
