# The example fleet's salt states: every machine runs the small web program.
base:
  '*':
    - web
