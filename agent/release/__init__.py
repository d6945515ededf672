"""Release of approved footage: streaming age encryption, the signed manifest, and delivery."""
