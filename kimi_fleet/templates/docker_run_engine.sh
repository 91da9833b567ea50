#!/bin/bash
# The engine's container, as one command (what kimi-engine-run executes).
__COMMAND__
