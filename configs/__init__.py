"""The shipped YAML recipes, installed as package data (``hcml.configs``) so that every install finds them."""
