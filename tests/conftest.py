import sys
from pathlib import Path

# make tests/lab.py importable as `lab`
sys.path.insert(0, str(Path(__file__).parent))
