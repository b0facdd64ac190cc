#!/usr/bin/env bash
# Refresh the dashboard screenshots in this folder: the browser tests save each page they
# check (overview, workflows, a failed run with its retries and compensation, a retried
# run, services) while running against a real broker and Redis. Needs chromium and
# chromium-driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
MEDIATOR_SCREENSHOTS=docs/screenshots python -m pytest -q tests/test_dashboard_browser.py
