"""The local engine: one thread, a step loop over the model, per-request steering in its attention."""
