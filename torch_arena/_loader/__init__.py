"""The DataLoader integration: worker-side collate, training-side restore, the loader."""
