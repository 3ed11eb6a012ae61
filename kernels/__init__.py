"""gristmill kernels: model loading and the engines. Knows nothing of Celery or Redis.

Import the submodules (kernels.loading, kernels.classify, kernels.generate); this package's own
import stays light so that importing it never pulls torch.
"""
