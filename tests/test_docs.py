"""The documentation cannot drift from the settings: README table, example config, --help."""

from __future__ import annotations

import re
import subprocess
import sys
import unittest

import settings
from tests.support import ROOT


class DocumentationTest(unittest.TestCase):
    def test_readme_holds_the_generated_option_table(self) -> None:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        self.assertIn(settings.markdown_table(), readme,
                      "README option table is stale: paste the output of `python3 settings.py`")

    def test_example_config_sets_every_key_and_is_valid(self) -> None:
        path = ROOT / "cclb.example.toml"
        text = path.read_text(encoding="utf-8")
        values = settings.read_config_file(str(path))
        mentioned = set(re.findall(r"^#?\s*(\w+)\s*=", text, re.MULTILINE))
        for setting in settings.SETTINGS:
            if not setting.cli_only:
                self.assertIn(setting.name, mentioned, f"{setting.name} missing from the example")
        for name, value in values.items():
            self.assertEqual(value, settings.BY_NAME[name].check(settings.BY_NAME[name].default),
                             f"example value of {name} is not the default")

    def test_help_lists_every_flag(self) -> None:
        result = subprocess.run([sys.executable, str(ROOT / "cclb.py"), "--help"],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0)
        for setting in settings.SETTINGS:
            for flag in setting.flags:
                self.assertIn(flag, result.stdout)

    def test_readme_states_the_test_command_that_ci_runs(self) -> None:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        command = "python3 -m unittest discover -s tests -t . -v"
        self.assertIn(command, readme)
        self.assertIn(command, ci)


if __name__ == "__main__":
    unittest.main()
