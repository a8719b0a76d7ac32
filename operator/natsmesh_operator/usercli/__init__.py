"""Commands for the people who run a mesh: ``check``, ``status`` and ``analyze``.

One module per command (:mod:`.check`, :mod:`.status`, :mod:`.analyze`); what
they compute from resources (:mod:`.rules`, :mod:`.view`, :mod:`.table`) is
pure and tested without servers. ``natsmesh operator`` never imports this
package: :mod:`natsmesh_operator.cli` loads a command's module only when it runs.
"""
