"""The knowledge graph and the model as PyKEEN gives them: triples and label maps, run directories and
the training callback, checkpoints, training, directions (inverse triples), model support, and the
plain-torch twins (replicas) of models whose scores and gradients can be computed faster."""
