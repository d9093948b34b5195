"""Analysis of stored results: pandas and matplotlib, importing neither Ray nor train/.

results (the store and K_opt tables), uncertainty (bootstrap over seeds), costmodel (time
on a named network), theory (the paper's bounds), plots and report. docs/design.md
section 2 has the layout and its import rules.
"""
