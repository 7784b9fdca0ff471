from hcml.launch.cli import main

raise SystemExit(main())
