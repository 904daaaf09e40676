"""Data: standard formats (manifests), phrase banks, batching and soundscape curation."""
