"""Integrations with other training frameworks: ``hf_trainer`` (transformers / TRL ``Trainer`` callback)."""
