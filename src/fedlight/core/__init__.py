"""Engine-independent core: round plan, state algebra, client/server pipelines, Lightning glue."""
