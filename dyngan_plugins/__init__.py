"""The built-in dyngan plugins, each module registered through the entry-point group ``dyngan``."""
