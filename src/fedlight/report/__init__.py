"""Plots, summary tables and other reports from fedlight run logs."""
