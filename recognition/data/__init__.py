"""Data layer: insightface .lst lists, identity-indexed RecordIO (.rec/.idx/property), the packer,
the Gluon dataset and loader, training augmentations and .bin verification sets.

Submodules are imported explicitly (`from recognition.data import record`) so that importing the
package stays cheap for tools that need only one of them.
"""
