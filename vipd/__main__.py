from vipd.cli import main

raise SystemExit(main())
