"""Channel attention (Algorithm 1 of the paper): how much the loss grows when each channel of a regularised
layer is removed, and the per-layer weights DELTA's feature-map term takes from it."""
