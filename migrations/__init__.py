"""The schema's migrations, shipped inside the wheel as `manager.migrations`."""
