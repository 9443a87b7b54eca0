import sys
from pathlib import Path

# the helper modules in tests/support are imported as top-level modules (`import natlab`)
sys.path.insert(0, str(Path(__file__).parent / "support"))
