"""Light, shared pieces of spherecast: config, grid, vocabulary, contracts, metrics, test factories."""
