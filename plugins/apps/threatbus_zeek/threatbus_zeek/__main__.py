"""``python -m threatbus_zeek``: print the path of the Zeek script to load into Zeek."""

from threatbus_zeek.plugin import script_path

if __name__ == "__main__":
    print(script_path())
