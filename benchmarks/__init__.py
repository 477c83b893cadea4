"""Speed benchmarks (not tests): synthesis, training step, federated round."""
