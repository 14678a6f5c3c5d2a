"""Helpers for the test suite: a network-namespace test host, a git server, a listener."""
