"""Dataset preparation tools for fluxtune (validate, caption, bucket, manifests)."""
