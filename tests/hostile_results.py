"""Hostile inputs: results (see hostile.py for what every case must keep)."""

from __future__ import annotations

from hostile import ApiCase, CliCase

CLI_CASES: list[CliCase] = []
API_CASES: list[ApiCase] = []
