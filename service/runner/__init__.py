"""Model runners: one loaded model per served variant, and the registry that maps variants to them."""
