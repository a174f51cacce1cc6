"""Test support: tiny-model builders and checks shared by the per-family test modules.

Family names may appear here (builders must name configs); `tests/test_adapters.py`
keeps them out of `collector/` (outside the adapters), `db/` and `report/`.
"""
