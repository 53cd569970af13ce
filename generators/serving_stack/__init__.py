"""Specs -> the serving stack of each host: service graph, compose, Prometheus, Grafana."""
