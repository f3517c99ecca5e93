"""protocols: wire formats only (pure data: enums, constants, `construct` schemas).

No I/O, no state, and no imports from the rest of pyvhost.
"""
