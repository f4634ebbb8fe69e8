"""The app layer: the `selma` CLI, `selma serve`/`up`/`run`/`demo`, SkillSet files and the local stack.

It may import the library and the services; nothing in the library or a service imports it.
"""
