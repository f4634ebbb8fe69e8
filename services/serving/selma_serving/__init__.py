"""ServingService (selma.v1.ServingService): merges skill experts and serves the multi-skill model."""
