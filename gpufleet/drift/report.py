"""A drift run's report: every layer check of every host, its exit code, and its three forms
(a table grouped by layer, JSON with the schema in schemas/drift-report.schema.json, and JUnit
XML with one test case per checked object).

Exit codes: 0 no drift; 1 drift found; 2 something could not be checked (named in `errors`,
and in the table): 2 wins over 1, since a layer that was not checked may hide drift.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.drift.items import LAYERS, DriftItem, Layer, LayerCheck

REPORT_FORMAT = "gpufleet.drift/v1"
EXIT_IN_SYNC, EXIT_DRIFT, EXIT_NOT_CHECKED = 0, 1, 2


@dataclass
class DriftReport:
    """Everything one `gpufleet drift` run found."""

    stack: str
    layers: list[Layer]  # the layers asked for
    checks: list[LayerCheck] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)  # layer -> why
    seconds: float = 0.0

    @property
    def items(self) -> list[DriftItem]:
        return [item for check in self.sorted_checks() for item in check.items]

    @property
    def errors(self) -> list[LayerCheck]:
        return [check for check in self.sorted_checks() if check.error]

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_NOT_CHECKED
        return EXIT_DRIFT if self.items else EXIT_IN_SYNC

    def sorted_checks(self) -> list[LayerCheck]:
        return sorted(self.checks, key=lambda check: (LAYERS.index(check.layer), check.host))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "stack": self.stack,
            "exit_code": self.exit_code,
            "status": ("in sync", "drift", "not checked")[self.exit_code],
            "layers": list(self.layers),
            "not_applicable": dict(self.not_applicable),
            "items": [item.to_json() for item in self.items],
            "checks": [check.to_json() for check in self.sorted_checks()],
            "seconds": round(self.seconds, 3),
        }


def write_json(report: DriftReport, path: Path) -> None:
    _write(path, json.dumps(report.to_json(), indent=1) + "\n")


def write_junit(report: DriftReport, path: Path) -> None:
    """One test suite per layer, one test case per (host, checked object): a failure per drift
    item, an error where the layer could not be checked."""
    suites = ET.Element("testsuites", name=f"gpufleet drift {report.stack}")
    for layer in LAYERS:
        checks = [check for check in report.sorted_checks() if check.layer == layer]
        if not checks:
            continue
        suite = ET.SubElement(suites, "testsuite", name=f"drift.{layer}")
        tests = failures = errors = 0
        for check in checks:
            classname = f"drift.{layer}.{check.host or report.stack}"
            for checked in check.checked:
                case = ET.SubElement(suite, "testcase", classname=classname, name=checked)
                tests += 1
                drifted = [item for item in check.items if item.object == checked]
                if drifted:
                    failures += 1
                    failure = ET.SubElement(
                        case,
                        "failure",
                        message=f"{len(drifted)} difference(s); repair: {drifted[0].repair}",
                    )
                    failure.text = "\n".join(
                        f"expected: {item.expected}\nfound: {item.found}" for item in drifted
                    )
            unattributed = [item for item in check.items if item.object not in check.checked]
            for item in unattributed:
                case = ET.SubElement(suite, "testcase", classname=classname, name=item.object)
                tests += 1
                failures += 1
                failure = ET.SubElement(case, "failure", message=f"repair: {item.repair}")
                failure.text = f"expected: {item.expected}\nfound: {item.found}"
            if check.error:
                case = ET.SubElement(suite, "testcase", classname=classname, name="checked")
                tests += 1
                errors += 1
                ET.SubElement(case, "error", message=check.error)
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", str(errors))
    ET.indent(suites)
    _write(path, ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n")


def table_lines(report: DriftReport) -> list[str]:
    """The human report: per layer, each host's verdict, then its items and errors."""
    lines: list[str] = []
    for layer in report.layers:
        checks = [check for check in report.sorted_checks() if check.layer == layer]
        if layer in report.not_applicable:
            lines.append(f"{layer}: not applicable ({report.not_applicable[layer]})")
            continue
        lines.append(f"{layer}:")
        if not checks:
            lines.append("  nothing to check")
        for check in checks:
            host = check.host or report.stack
            if check.error:
                verdict = "NOT CHECKED"
            elif check.items:
                verdict = f"DRIFT ({len(check.items)})"
            else:
                verdict = "in sync"
            lines.append(
                f"  {host:<20} {verdict:<12} {len(check.checked)} object(s) in "
                f"{check.seconds:.1f} s"
            )
            for item in check.items:
                lines.append(f"    {item.object}")
                lines.extend(_indented("expected", item.expected))
                lines.extend(_indented("found", item.found))
                lines.append(f"      repair:   {item.repair}")
            if check.error:
                lines.append(f"    {check.error}")
    verdict = ("no drift", f"{len(report.items)} drift item(s)", "")[report.exit_code]
    if report.exit_code == EXIT_NOT_CHECKED:
        verdict = f"{len(report.errors)} check(s) could not run, {len(report.items)} drift item(s)"
    lines.append(f"stack {report.stack}: {verdict} ({report.seconds:.1f} s)")
    return lines


def _indented(label: str, text: str) -> list[str]:
    first, *rest = text.splitlines() or [""]
    return [f"      {label + ':':<9} {first}", *(f"                {line}" for line in rest)]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)
