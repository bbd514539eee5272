"""Kubeflow pipelines of imgclf: the wiring of components into DAGs, cluster settings, compile.

Kubernetes specifics (GPU, node selector, toleration, secrets, retries, caching) live only
here, never in the components or the library (STYLE rule 8).
"""
