from rrcm.cli import main

raise SystemExit(main())
