"""The doctor's rules, one module per family; importing this package registers all of them."""

from gradwise.doctor.rules import data, dynamics, generalisation, model  # noqa: F401
