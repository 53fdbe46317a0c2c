"""The served test model's name and API key (shared by the fixture and the tests)."""

MODEL = "tiny-longvila"
KEY = "test-key"
