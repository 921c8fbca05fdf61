"""PEFT integrations, one subpackage per method."""
