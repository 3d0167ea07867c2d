"""Reading run folders into figures and REPORT.md; torch-free."""
