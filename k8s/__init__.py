"""Kubernetes packaging of adaccel: the Helm chart, its generated schema and settings table, offline checks."""
